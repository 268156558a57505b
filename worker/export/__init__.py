"""Delivery of result objects to PACS destinations: C-STORE and STOW-RS, recorded attempts, bounded retries."""
