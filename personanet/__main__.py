from personanet.cli import main

main()
