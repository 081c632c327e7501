"""Flower server side: LTEStrategy and the ServerApp."""
