"""The model side: tasks and their prompts, control tokens, loading, the decode loop and parsing its output."""
