"""The pod watcher: the only service that reads pods and nodes from the API, and the admission
webhook that holds slice pods behind mpsflow's scheduling gate; it never plans."""
