"""The dashboard at /ui (scalpel serve): routes.py and the page in static/."""
