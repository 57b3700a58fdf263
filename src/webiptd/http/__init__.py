"""The HTTPS API: the wire (request heads, answers), the routes (app) and the connections (server)."""
