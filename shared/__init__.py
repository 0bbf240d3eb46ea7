"""Hifi's common library: event model, codec, topics, config, app factory, metrics, Sentry."""
