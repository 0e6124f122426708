"""Scale-out: expert-parallel token exchange, FSDP2 + EP parallelisation, the Lightning strategy."""
