"""Isthmus east-west gateway: the data path on trio + h2."""
