"""Sources: where changes come from, read and turned into `Change`s.

Each module reads one kind of source and maps what it reads; none touches the store.
"""
