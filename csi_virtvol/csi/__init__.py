"""The gRPC adapter: parse requests, call services, build responses.  Nothing else."""
