"""The shared language of mpsflow: typed events, their envelope, subjects, and the JetStream adapter.

Every service imports this package; it imports no service.
"""
