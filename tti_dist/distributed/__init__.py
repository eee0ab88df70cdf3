"""Process groups (megatron-core parallel_state), DeepSpeed mpu adapter, ZeRO config."""
