"""gRPC and sockets: the service, the one map from faults to statuses, the interceptor, the
unix-socket gateway, the health listener."""
