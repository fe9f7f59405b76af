"""Generated protobuf code of the rlhf wire contract (package rlhfpb.v1)."""
