# Placeholder until the deployment issue: a CUDA PyTorch image that runs the same flow.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir .
CMD ["lr-sweep", "run"]
