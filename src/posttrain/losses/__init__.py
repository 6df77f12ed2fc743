"""posttrain.losses"""
