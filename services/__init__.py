"""Hifi's services, one per pipeline stage; `services.registry` names them for `hifi run`."""
