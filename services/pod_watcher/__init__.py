"""The pod watcher: the only service that reads pods and nodes from the API; it never plans."""
