"""HTTP and WebSocket routes: protocol only (parse, validate, shape responses); see server/service.py."""
