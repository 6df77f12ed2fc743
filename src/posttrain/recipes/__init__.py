"""posttrain.recipes"""
