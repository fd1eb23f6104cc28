"""The streaming loader, one module per stage: plan, stream, decode (batch.py on the CPU or
dali_decode.py), batch; stages.py lists a worker's stages, wire.py carries batches out of it,
loader.py ties them together. types.py holds the batch types the models import."""
