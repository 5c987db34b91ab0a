"""What leaves a run: mixture checkpoints, the PEFT adapter, the shard-aware merged model, merging a saved
checkpoint after the fact, and generation from any of them."""
