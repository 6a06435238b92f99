"""Stand-ins for outside services (LLM APIs, ...) that tests run against on the loopback interface."""
