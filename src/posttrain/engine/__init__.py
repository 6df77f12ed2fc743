"""posttrain.engine"""
