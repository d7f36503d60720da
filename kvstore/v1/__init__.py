"""The wire contract: protobuf and gRPC code generated at build time from protos/kvstore/v1."""
