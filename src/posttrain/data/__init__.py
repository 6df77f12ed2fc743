"""posttrain.data"""
