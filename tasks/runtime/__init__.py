"""What a deployment embeds: load a bundle (one artifact per input-shape bucket) and run raw samples on it."""
