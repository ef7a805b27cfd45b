"""Edge protection: rate limits, deny lists and the web application firewall (issue 14)."""
