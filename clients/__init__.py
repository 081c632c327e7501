"""Flower client side: the one-head LTE ClientApp and the full-model FedAvg client."""
