"""Ray jobs that turn image-caption sources into WebDataset shards plus a manifest."""
