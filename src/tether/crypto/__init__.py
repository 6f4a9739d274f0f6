"""Cryptography: Ed25519 + DSSE signing, AES-GCM sealing, RFC 6962 Merkle trees."""
