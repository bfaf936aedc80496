"""The moto scenario of tests/tests/moto.rs: a VPC built through the real EC2
API (moto's server), then dumped as the AWS CLI prints it.

usage: scenario.py ENDPOINT OUTDIR create   -> OUTDIR/{vpcs,subnets,...}.json, ids.json
       scenario.py ENDPOINT OUTDIR authorize GROUP PORT   (tcp from 0.0.0.0/0)
       scenario.py ENDPOINT OUTDIR revoke GROUP PORT
       scenario.py ENDPOINT OUTDIR dump
       scenario.py ENDPOINT OUTDIR create-live VPC_CIDR CIDR_A CIDR_B IP_WEB IP_DB
           -> ids.json: a VPC for the lab's addresses (the live check): web1 in
              subnet a, db1 in subnet b, db's group lets web's in on 5432
"""
import json
import sys

import boto3

endpoint, out, cmd = sys.argv[1], sys.argv[2], sys.argv[3]
ec2 = boto3.client(
    "ec2",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="testing",
    aws_secret_access_key="testing",
)


def dump():
    docs = {
        "vpcs": ec2.describe_vpcs(),
        "subnets": ec2.describe_subnets(),
        "instances": ec2.describe_instances(),
        "security-groups": ec2.describe_security_groups(),
        "network-acls": ec2.describe_network_acls(),
        "prefix-lists": ec2.describe_managed_prefix_lists(
            Filters=[{"Name": "owner-id", "Values": ["123456789012"]}]
        ),
    }
    for pl in docs["prefix-lists"]["PrefixLists"]:
        e = ec2.get_managed_prefix_list_entries(PrefixListId=pl["PrefixListId"])
        e["PrefixListId"] = pl["PrefixListId"]
        docs["entries-" + pl["PrefixListId"]] = e
    for name, doc in docs.items():
        doc.pop("ResponseMetadata", None)
        with open(f"{out}/{name}.json", "w") as f:
            json.dump(doc, f, indent=1, default=str)


if cmd == "create":
    vpc = ec2.create_vpc(CidrBlock="10.30.0.0/16", AmazonProvidedIpv6CidrBlock=True)["Vpc"]
    vpc_id = vpc["VpcId"]
    v6 = ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"][0]["Ipv6CidrBlockAssociationSet"][0][
        "Ipv6CidrBlock"
    ]
    # Two /64s of the VPC's /56.
    import ipaddress

    net = ipaddress.ip_network(v6)
    s64 = list(net.subnets(new_prefix=64))
    sa = ec2.create_subnet(VpcId=vpc_id, CidrBlock="10.30.1.0/24", Ipv6CidrBlock=str(s64[1]))["Subnet"]
    sb = ec2.create_subnet(VpcId=vpc_id, CidrBlock="10.30.2.0/24", Ipv6CidrBlock=str(s64[2]))["Subnet"]
    pl = ec2.create_managed_prefix_list(
        PrefixListName="office",
        AddressFamily="IPv4",
        MaxEntries=5,
        Entries=[{"Cidr": "198.51.100.0/24", "Description": "office"}],
    )["PrefixList"]
    web = ec2.create_security_group(GroupName="web", Description="web", VpcId=vpc_id)["GroupId"]
    db = ec2.create_security_group(GroupName="db", Description="db", VpcId=vpc_id)["GroupId"]
    ec2.authorize_security_group_ingress(
        GroupId=web,
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": 443,
                "ToPort": 443,
                "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
                "Ipv6Ranges": [{"CidrIpv6": "::/0"}],
            },
            {"IpProtocol": "icmp", "FromPort": 8, "ToPort": -1, "IpRanges": [{"CidrIp": "10.30.0.0/16"}]},
        ],
    )
    ec2.authorize_security_group_ingress(
        GroupId=db,
        IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "UserIdGroupPairs": [{"GroupId": web}]},
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "PrefixListIds": [{"PrefixListId": pl["PrefixListId"]}]},
        ],
    )
    acl = ec2.create_network_acl(VpcId=vpc_id)["NetworkAcl"]["NetworkAclId"]
    for n, action, egress, cidr, ports in [
        (90, "deny", False, "10.30.1.11/32", None),
        (100, "allow", False, "0.0.0.0/0", None),
        (110, "deny", False, "0.0.0.0/0", (5432, 5432)),
        (100, "allow", True, "0.0.0.0/0", None),
    ]:
        kw = {}
        if ports:
            kw["PortRange"] = {"From": ports[0], "To": ports[1]}
        ec2.create_network_acl_entry(
            NetworkAclId=acl, RuleNumber=n, Protocol="-1" if not ports else "6",
            RuleAction=action, Egress=egress, CidrBlock=cidr, **kw,
        )
    for n, egress in [(101, False), (101, True)]:
        ec2.create_network_acl_entry(
            NetworkAclId=acl, RuleNumber=n, Protocol="-1", RuleAction="allow",
            Egress=egress, Ipv6CidrBlock="::/0",
        )
    # AWS gives a VPC with an IPv6 block a default NACL that allows IPv6
    # too; moto does not, so the scenario adds those entries (rule 101).
    default_acl = ec2.describe_network_acls(
        Filters=[{"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "default", "Values": ["true"]}]
    )["NetworkAcls"][0]["NetworkAclId"]
    for egress in (False, True):
        ec2.create_network_acl_entry(
            NetworkAclId=default_acl, RuleNumber=101, Protocol="-1", RuleAction="allow",
            Egress=egress, Ipv6CidrBlock="::/0",
        )
    # Associate the new ACL with subnet b (replacing the default's association).
    assoc = [
        a
        for a in ec2.describe_network_acls(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["NetworkAcls"]
        for a in a["Associations"]
        if a["SubnetId"] == sb["SubnetId"]
    ][0]
    ec2.replace_network_acl_association(AssociationId=assoc["NetworkAclAssociationId"], NetworkAclId=acl)
    ami = ec2.describe_images()["Images"][0]["ImageId"]
    ids = {"vpc": vpc_id, "subnet_a": sa["SubnetId"], "subnet_b": sb["SubnetId"], "web": web, "db": db,
           "acl": acl, "pl": pl["PrefixListId"], "v6_a": str(s64[1]), "v6_b": str(s64[2])}
    for name, subnet, ip, v6addr, groups in [
        ("web1", sa, "10.30.1.10", str(s64[1][0x10]), [web]),
        ("web2", sa, "10.30.1.11", None, [web]),
        ("db1", sb, "10.30.2.20", str(s64[2][0x20]), [db]),
    ]:
        eni = {
            "DeviceIndex": 0,
            "SubnetId": subnet["SubnetId"],
            "PrivateIpAddress": ip,
            "Groups": groups,
        }
        if v6addr:
            eni["Ipv6Addresses"] = [{"Ipv6Address": v6addr}]
        r = ec2.run_instances(
            ImageId=ami, MinCount=1, MaxCount=1, InstanceType="t3.micro",
            NetworkInterfaces=[eni],
        )
        inst = r["Instances"][0]
        if v6addr:
            # moto ignores Ipv6Addresses in RunInstances; assign them after.
            ec2.assign_ipv6_addresses(
                NetworkInterfaceId=inst["NetworkInterfaces"][0]["NetworkInterfaceId"],
                Ipv6Addresses=[v6addr],
            )
        ids[name + "_v6"] = v6addr
        ids[name] = r["Instances"][0]["InstanceId"]
    with open(f"{out}/ids.json", "w") as f:
        json.dump(ids, f, indent=1)
    dump()
elif cmd == "create-live":
    vpc_cidr, cidr_a, cidr_b, ip_web, ip_db = sys.argv[4:9]
    vpc_id = ec2.create_vpc(CidrBlock=vpc_cidr)["Vpc"]["VpcId"]
    sa = ec2.create_subnet(VpcId=vpc_id, CidrBlock=cidr_a)["Subnet"]["SubnetId"]
    sb = ec2.create_subnet(VpcId=vpc_id, CidrBlock=cidr_b)["Subnet"]["SubnetId"]
    web = ec2.create_security_group(GroupName="web", Description="web", VpcId=vpc_id)["GroupId"]
    db = ec2.create_security_group(GroupName="db", Description="db", VpcId=vpc_id)["GroupId"]
    ec2.authorize_security_group_ingress(
        GroupId=db,
        IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "UserIdGroupPairs": [{"GroupId": web}]},
        ],
    )
    ami = ec2.describe_images()["Images"][0]["ImageId"]
    ids = {"vpc": vpc_id, "subnet_a": sa, "subnet_b": sb, "web": web, "db": db}
    for name, subnet, ip, group in [("web1", sa, ip_web, web), ("db1", sb, ip_db, db)]:
        r = ec2.run_instances(
            ImageId=ami, MinCount=1, MaxCount=1, InstanceType="t3.micro",
            NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": subnet, "PrivateIpAddress": ip, "Groups": [group]}],
        )
        ids[name] = r["Instances"][0]["InstanceId"]
    with open(f"{out}/ids.json", "w") as f:
        json.dump(ids, f, indent=1)
elif cmd in ("authorize", "revoke"):
    group, port = sys.argv[4], int(sys.argv[5])
    perm = [{"IpProtocol": "tcp", "FromPort": port, "ToPort": port, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    if cmd == "authorize":
        ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=perm)
    else:
        ec2.revoke_security_group_ingress(GroupId=group, IpPermissions=perm)
    dump()
elif cmd == "dump":
    dump()
