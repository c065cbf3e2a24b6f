"""Packets on disk: pcap/pcapng reading, the candidate classifier, the writer,
frame builders."""
