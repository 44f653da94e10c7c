"""What the server, the trainer and the admin CLI share: one home for each concept."""
