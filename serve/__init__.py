"""Inference server: SageMaker's /ping and /invocations over FastAPI and uvicorn."""
