"""Training entry point: SageMaker's training contract, EC2 and laptops alike."""
