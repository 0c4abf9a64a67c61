"""Tests of the guest-conversion adapter (argument building, classification, real conversions)."""
