"""Stand-in of upstream's liveavatar.models package (avatarcli tests; no code from upstream)."""
