"""Tests of the transfer function against vcsim-ferry, the OpenStack lab, nbdkit and nats-server."""
