"""The process and the LAN: `edgelm serve`'s lifecycle (main), systemd notification
(sdnotify), mDNS advertising and discovery (mdns)."""
