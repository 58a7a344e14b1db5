"""Writes the GET data sets of benches/load.sh: `count` random bodies of `size` bytes as files
for nginx (www/<set>/<i>) and as Gradle artifacts <set>-<i> on Kura, over one keep-alive
connection; then reads a sample back from both servers and compares the bytes.

usage: preload.py WORK_DIR KURA_PORT NGINX_PORT TOKEN SET SIZE COUNT
"""
import http.client
import os
import random
import sys

work, kura_port, nginx_port, token, name, size, count = sys.argv[1:]
size, count = int(size), int(count)
directory = os.path.join(work, "www", name)
os.makedirs(directory, exist_ok=True)
auth = {"Authorization": "Bearer " + token}
kura = http.client.HTTPConnection("127.0.0.1", int(kura_port))
nginx = http.client.HTTPConnection("127.0.0.1", int(nginx_port))


def kura_path(i):
    return f"/api/cache/gradle/{name}-{i}?account_handle=dev"


def request(connection, method, path, body=None, headers=None):
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    return response.status, data


for i in range(count):
    body = os.urandom(size)
    with open(os.path.join(directory, str(i)), "wb") as f:
        f.write(body)
    status, _ = request(kura, "PUT", kura_path(i), body, auth)
    if status not in (200, 201, 204):
        sys.exit(f"preload: kura PUT {name}-{i} answered {status}")

for i in random.sample(range(count), min(count, 50)):
    with open(os.path.join(directory, str(i)), "rb") as f:
        expected = f.read()
    for server, connection, path, headers in (
        ("kura", kura, kura_path(i), auth),
        ("nginx", nginx, f"/{name}/{i}", {}),
    ):
        status, data = request(connection, "GET", path, headers=headers)
        if status != 200 or data != expected:
            sys.exit(f"preload: {server} returned status {status} or different bytes for {name}/{i}")
print(f"{name}: {count} x {size} bytes on both servers, a sample of 50 byte-identical")
