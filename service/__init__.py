"""Everything around the model: settings, HTTP API, Redis queue, engine and workers."""
