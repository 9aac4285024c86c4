"""Looking at results: overlays drawn on images and the HTML gallery."""
