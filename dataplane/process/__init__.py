"""Process management: the supervisor, worker processes, the push link, the config channel and its state file."""
