"""Pixel-BERT pretraining: model, configs, optimizer, targets (training loop and loader follow)."""
