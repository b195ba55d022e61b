"""Weight updates from a trainer: receiver, sender, buckets and cached-index post-processing.

Live updates reuse the loader's `(name, tensor)` interface (`model.loader.load_weights`)."""
