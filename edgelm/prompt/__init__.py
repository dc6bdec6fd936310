"""From messages to a prompt and its constraints: chat templates (chat, gotemplate)
and the grammar engine (grammar). Shared by the daemon and `edgelm run`."""
