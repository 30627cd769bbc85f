"""Isthmus federation: the registry service on etcd, its API client, shared models and the CLI."""
