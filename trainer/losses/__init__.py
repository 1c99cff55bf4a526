"""Training objectives: contrastive with queues, captioning, load balance."""
