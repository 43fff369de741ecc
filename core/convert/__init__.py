"""Conversions between the protobuf contracts and core's domain shapes, one module per
message family, used by both ends of each contract."""
