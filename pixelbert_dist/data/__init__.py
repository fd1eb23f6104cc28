"""The streaming loader, one module per stage: plan, stream, batch; loader ties them together."""
