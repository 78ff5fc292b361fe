"""Evaluation harness: POPE, CHAIR and MME on LLaVA checkpoints, resumable and shardable with accelerate."""
