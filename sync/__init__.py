"""sync: bring the users and rows a Supabase production database gained into a newer-schema copy."""

__version__ = "0.1.0"
