"""Generator backends (`generator` slot): the shared interface and its implementations."""
